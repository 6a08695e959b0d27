"""The Dockerfile, built with podman and run: the native core compiles into the image, the
container serves /healthz and REAPI on published ports, Stoker runs in it as root with only
the capabilities the manifests in deploy/ grant, executes an action under a slot uid that
can change neither its inputs nor the cache, and drains to a clean exit on SIGTERM. Run as
`stoker executor`, as deploy/kubernetes and deploy/ecs run it, the image joins the BuildBuddy
scheduler double (tests/doubles/buildbuddy_scheduler.py) and runs an action for it.

No registry is reachable from these machines, so the base image is Debian bookworm made
with debootstrap and `podman import`ed as BASE; it is kept in podman's storage between runs
(delete it with `podman rmi localhost/stoker-test-base:bookworm`). The build's layers are
kept too, so a rebuild after a source edit only reinstalls Stoker. Cold (no base image, no
layers) this module takes a few minutes; warm, well under one.

No mirror or package index is named here: debootstrap gets the apt mirror this machine uses
for bookworm, pip in the build this machine's pip index; where none is set, each tool its
own default.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from google.rpc import code_pb2

from engine.proto import re_pb2
from tests.deploy.privileges import ACTION_UIDS, CAPABILITIES, CAPABILITY_BITS
from tests.doubles.buildbuddy_scheduler import BuildBuddySchedulerDouble
from tests.images import ImageError, ensure_base_image
from tests.integration.support import Client, command, digest_of, free_port

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
IMAGE = "localhost/stoker:test"
# The host's CA bundle, handed to pip in the build: where egress goes through a
# TLS-intercepting proxy, its CA is in there and not in the base image.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/stoker-build-ca.crt"

# Builds and runs images; a cold run debootstraps and downloads wheels.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


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


def pip_index() -> str | None:
    """This machine's pip index (index-url), for pip in the build; None: pip's default.

    `pip config list` merges the environment (PIP_INDEX_URL) and every pip.conf (/etc/pip.conf,
    /etc/xdg/pip/pip.conf, the user's, the virtualenv's) as pip itself does. Only a network
    URL is passed on: a file:// or path index on this machine is not in the build."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():  # name='value', the value as Python's repr
        name, sep, value = line.partition("=")
        try:
            found[name.strip()] = str(ast.literal_eval(value.strip())) if sep else ""
        except (ValueError, SyntaxError):
            continue
    # pip's order: the environment over `pip install`'s own section over [global].
    for name in (":env:.index-url", "install.index-url", "global.index-url"):
        url = found.get(name, "")
        if url.startswith(("http://", "https://")):
            return url
    return None


_REASON = _unusable()
if _REASON:
    pytestmark = [*pytestmark, pytest.mark.skip(reason=_REASON)]


@pytest.fixture(scope="module")
def base_image() -> str:
    """BASE, made once per machine (tests/images.py)."""
    try:
        return ensure_base_image()
    except ImageError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """IMAGE, built from the repository's Dockerfile on BASE."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    args = ["build", "--format", "docker",  # docker format: OCI images drop HEALTHCHECK
            "--build-arg", f"BASE_IMAGE={base_image}", "-t", IMAGE, "-f", "Dockerfile"]
    if HOST_CA.exists():
        args += ["-v", f"{HOST_CA}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]
    index = pip_index()
    if index:
        args += ["--build-arg", f"PIP_INDEX={index}"]
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


# Run in the container by Container.processes.
PROCESSES = r"""
import json, os
found = []
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        status = dict(line.split(":", 1) for line in open(f"/proc/{p}/status"))
    except OSError:
        continue  # gone meanwhile
    if p != "1" and int(p) != os.getpid():
        found.append({"cmdline": cmdline, "Uid": status["Uid"].strip(),
                      "CapEff": status["CapEff"].strip()})
print(json.dumps(found))
"""


class Container:
    """One `podman run -d` of the image with the REAPI and health ports published.

    host_http_port: the container shares the host's network namespace instead
    (--network=host) and its config serves health on that port of the host's loopback;
    nothing is published. options: more for `podman run`; command: what follows the
    entrypoint (the image's CMD when empty)."""

    def __init__(self, image: str, *, host_http_port: int | None = None,
                 options: Sequence[str] = (), command: Sequence[str] = ()) -> None:
        self.name = f"stoker-test-{uuid.uuid4().hex[:12]}"
        self.reapi_port = free_port()
        self.http_port = host_http_port or free_port()
        if host_http_port is None:
            network = ["-p", f"127.0.0.1:{self.reapi_port}:1985",
                       "-p", f"127.0.0.1:{self.http_port}:8080"]
        else:
            network = ["--network=host"]
        # Confined as deploy/'s manifests confine it: a read-only root with nothing writable
        # but the data volume (no tmpfs on /tmp, /var/tmp or /run, which podman's --read-only
        # would add: Kubernetes and Fargate add none, and the manifests mount no /tmp), no
        # capability but the ones they keep (a rootful podman would otherwise give its
        # default set, with several Stoker has no use for), and no_new_privs
        # (allowPrivilegeEscalation: false). The healthcheck timer needs systemd, absent
        # here; the test runs the check itself.
        caps = [f"--cap-add={c}" for c in sorted(CAPABILITIES)]
        podman("run", "-d", "--name", self.name, "--read-only", "--read-only-tmpfs=false",
               "--health-interval", "disable",
               "--cap-drop=all", *caps, "--security-opt=no-new-privileges",
               *network, *options, image, *command)

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

    def wait_ready(self, within: float = 30.0) -> dict:
        """The /readyz answer once it is 200 (a worker holds a session with the scheduler);
        fails with the last 503 and the log otherwise."""
        deadline = time.monotonic() + within
        while True:
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=2) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as e:
                if time.monotonic() > deadline:
                    pytest.fail(f"/readyz still {e.code}: {e.read()!r}\n{self.logs()}",
                                pytrace=False)
            time.sleep(0.25)

    def status(self) -> dict:
        with urllib.request.urlopen(self.url("/statusz"), timeout=5) as reply:
            return json.loads(reply.read())

    def leftovers(self) -> list[str]:
        """Whatever is still inside an action directory's root/ or tmp/ under the build
        directory, which Stoker empties after every action."""
        out = podman("exec", self.name, "find", "/var/lib/stoker/build", "(", "-path",
                     "*/root/*", "-o", "-path", "*/tmp/*", ")", check=False)
        return (out.stdout + out.stderr).split()

    def processes(self) -> list[dict[str, str]]:
        """cmdline, Uid and CapEff of every process in the container but tini and the one
        asking."""
        out = podman("exec", self.name, "python3", "-c", PROCESSES).stdout
        return json.loads(out)

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
    # Stoker runs as root, so that actions can run as slot uids (see the Dockerfile).
    assert config.get("User", "") in ("", "0", "root", "0:0")
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
    assert checked.stdout.startswith("/etc/stoker/executor.yaml: ") and \
        checked.stdout.rstrip().endswith("\nOK"), checked.stdout
    version = podman("run", "--rm", image, "version").stdout
    assert "digest implementation: native" in version.splitlines()
    # No user or group has an id among the action uids: an action must not get its files.
    for database in ("passwd", "group"):
        entries = podman("run", "--rm", "--entrypoint", "getent", image, database).stdout
        taken = [e for e in entries.splitlines() if int(e.split(":")[2]) in ACTION_UIDS]
        assert not taken, taken
    # The data directory: root's, passable by the action uids but not listable or writable.
    mode = podman("run", "--rm", "--entrypoint", "stat", image, "-c", "%u:%g %a",
                  "/var/lib/stoker").stdout.split()
    assert mode == ["0:0", "711"]


def test_health_endpoints_and_healthcheck(container: Container) -> None:
    assert container.wait_healthy() == {"healthy": True}
    # Readiness follows once a worker holds a session with the embedded server.
    assert container.wait_ready()["ready"] is True
    # The image's own HEALTHCHECK command, run in the container, passes.
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert container.state()["Running"]


def test_stoker_runs_as_root_with_the_granted_capabilities_only(container: Container) -> None:
    """The supervisor and every process it started: uid 0, and CapEff exactly the set that
    deploy/'s manifests grant (so the test below shows that set is enough)."""
    mask = sum(1 << CAPABILITY_BITS[c] for c in CAPABILITIES)
    stoker = [p for p in container.processes() if "/opt/stoker/bin/" in p["cmdline"]]
    assert any(" up --config " in p["cmdline"] for p in stoker), stoker
    for p in stoker:
        assert p["Uid"].split() == ["0"] * 4, p
        assert int(p["CapEff"], 16) == mask, p


# What the action reports, one `name: outcome` line each. It tries what a hostile action
# would: write through its input (a hardlink to the cache's blob), making it writable first,
# and write or list the cache and the data directory. It writes in its TMPDIR (inside its
# action directory) and tries /tmp, which the manifests leave read-only: a /tmp shared by
# every slot uid would let actions remove each other's files there unless sticky. And it
# leaves what only CAP_DAC_OVERRIDE lets root read and remove (a 0000 file in a 0500
# directory in a 0000 one, in its exec root and its TMPDIR).
ACTION = r"""
attempt() {
    name=$1; shift
    if "$@" >/dev/null 2>&1; then echo "$name: done"; else echo "$name: refused"; fi
}
cat in.txt
echo "uid: $(id -u)"
echo "gid: $(id -g)"
attempt "input write" sh -c 'chmod 0666 in.txt; echo changed >> in.txt'
attempt "cache write" touch /var/lib/stoker/cache/x
attempt "cache list" ls /var/lib/stoker/cache
attempt "data write" touch /var/lib/stoker/x
attempt "data list" ls /var/lib/stoker
attempt "tmpdir write" sh -c 'echo x > "$TMPDIR/x"'
attempt "tmp write" sh -c 'echo x > /tmp/stoker-test-$$'
for top in trap "$TMPDIR/trap"; do
    mkdir -p "$top/deep" && echo secret > "$top/deep/f" && chmod 0000 "$top/deep/f" \
        && chmod 0500 "$top/deep" && chmod 0000 "$top"
done
echo made > out/result.txt
sleep 60 >/dev/null 2>&1 &  # an orphan for tini to reap
"""


def test_executes_an_action_under_a_slot_uid(container: Container, client: Client) -> None:
    original = b"hello from the input root\n"
    ex = client.run(ACTION, {"in.txt": original}, output_paths=["out/result.txt"])
    response = ex.response
    assert response.status.code == 0, (response.status, container.logs())
    result = response.result
    assert result.exit_code == 0, (stdout_of(client, result),
                                   client.read(result.stderr_digest), container.logs())
    first, *lines = stdout_of(client, result).decode().splitlines()
    assert first == original.decode().strip()
    report = dict(line.split(": ", 1) for line in lines)
    # All at once, so that a failure shows every outcome. A slot uid and gid from
    # action_uids (not root, which Stoker is); nothing of the cache's to change or see.
    outcomes = {"slot uid": int(report["uid"]) in ACTION_UIDS,
                "slot gid": int(report["gid"]) in ACTION_UIDS,
                **{k: v for k, v in report.items() if k not in ("uid", "gid")}}
    assert outcomes == {"slot uid": True, "slot gid": True, "input write": "refused",
                        "cache write": "refused", "cache list": "refused",
                        "data write": "refused", "data list": "refused",
                        "tmpdir write": "done", "tmp write": "refused"}, report
    assert client.read(digest_of(original)) == original
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
    # Root got through the modes the action left and emptied its directory: the kept
    # capabilities (no DAC_READ_SEARCH among them) are enough to clean up after any action.
    deadline = time.monotonic() + 10
    while (left := container.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not left, (left, container.logs())


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


# ---- joined mode: `stoker executor` in the image --------------------------------------------

EXECUTOR_CONFIG = """\
executor:
  server: {server}
  protocol: buildbuddy
  data_dir: /var/lib/stoker
  workers: 1
  num_concurrent_actions: 1
  default_timeout: 60s
  drain_grace: 10s
  health_listen: 127.0.0.1:{http_port}
  metrics_listen: 'off'
  log_format: json
  enable_debug_logging: true   # the API key must stay out of even the most verbose log
"""
JOINED_ACTION = "mkdir -p out && cat in.txt > out/copy.txt && id -u && exit 3"


def test_executor_joins_a_buildbuddy_scheduler(image: str, tmp_path: Path) -> None:
    """The image as deploy/kubernetes and deploy/ecs run it (`executor --config ...`, the API
    key in EXECUTOR_API_KEY, the same confinement as above) joins the BuildBuddy scheduler
    double (tests/doubles/buildbuddy_scheduler.py), which runs in this process and requires
    the key: it registers, runs a real action under a slot uid with its outputs uploaded to
    the double's CAS, is ready while connected, never logs the key, and drains on SIGTERM
    (ShuttingDownRequest, exit 0) without breaking any rule the double checks."""
    api_key = f"bb-container-key-{uuid.uuid4().hex}"
    config = tmp_path / "executor.yaml"
    http_port = free_port()

    async def main() -> None:
        async with BuildBuddySchedulerDouble(tmp_path / "double", api_key=api_key,
                                             max_leases_per_executor=2) as double:
            config.write_text(EXECUTOR_CONFIG.format(server=double.target,
                                                     http_port=http_port))
            config.chmod(0o644)
            # --network=host: the double listens on the host's 127.0.0.1, which a container
            # in a network namespace of its own cannot reach (its loopback is its own, and
            # podman's host gateway address would need the double on a routable interface).
            # Sharing the host's namespace keeps everything on loopback; the health port in
            # the config is then a free port of the host's, and nothing is published.
            container = await asyncio.to_thread(
                Container, image, host_http_port=http_port,
                options=["-e", f"EXECUTOR_API_KEY={api_key}",
                         "-v", f"{config}:/etc/stoker/executor.yaml:ro"],
                command=["executor", "--config", "/etc/stoker/executor.yaml"])
            try:
                await joined(container, double, api_key)
            finally:
                print(container.logs())  # shown by pytest when the test fails
                await asyncio.to_thread(container.remove)
        assert not double.violations, "the scheduler double saw rules broken:\n  " + \
            "\n  ".join(double.violations)

    asyncio.run(asyncio.wait_for(main(), 240))


async def joined(container: Container, double: BuildBuddySchedulerDouble, api_key: str) -> None:
    await asyncio.to_thread(container.wait_healthy)
    await double.until(lambda: len(double.executors) == 1, timeout=60,
                       what="the container's registration")
    seen = double.executor()
    assert seen.node.os_family == "linux" and seen.node.assignable_milli_cpu > 0
    # Ready while a worker holds its session with the scheduler; /statusz says which.
    assert (await asyncio.to_thread(container.wait_ready))["ready"] is True
    scheduler = (await asyncio.to_thread(container.status))["scheduler"]
    assert scheduler["address"] == double.target
    assert scheduler["protocol"] == "buildbuddy" and not scheduler["embedded"]
    assert scheduler["workers_connected"] == 1
    processes = await asyncio.to_thread(container.processes)
    assert any(" executor --config " in p["cmdline"] for p in processes), processes

    task_id = double.enqueue(command(["/bin/sh", "-c", JOINED_ACTION],
                                     output_paths=["out/copy.txt"]),
                             {"in.txt": b"joined input\n"})
    response = await double.result(task_id, timeout=60)
    assert response.status.code == code_pb2.OK, response.status
    result = response.result
    assert result.exit_code == 3, result
    assert int(double.read_blob(result.stdout_digest)) in ACTION_UIDS
    [output] = result.output_files
    assert output.path == "out/copy.txt"
    assert output.digest == digest_of(b"joined input\n")
    assert double.read_blob(output.digest) == b"joined input\n"
    assert double.tasks[task_id].leased_by == [seen.executor_id]

    # SIGTERM (the image's STOPSIGNAL, through tini): no more work, the scheduler is told,
    # a clean exit. podman stop blocks, so the double keeps serving meanwhile.
    started = time.monotonic()
    await asyncio.to_thread(podman, "stop", "--time", "40", container.name, timeout=60)
    took = time.monotonic() - started
    state = await asyncio.to_thread(container.state)
    assert not state["Running"]
    assert state["ExitCode"] == 0, container.logs()
    assert took < 30, f"stopping took {took:.1f} s with nothing running"
    assert seen.shutting_down and seen.shutdown_requests == [[]], seen.shutdown_requests
    assert not seen.open_leases

    done = await asyncio.to_thread(podman, "logs", container.name)
    log = done.stdout + done.stderr
    assert "registering with" in log and "draining" in log, log[-4000:]
    assert api_key not in log
