"""End to end: Bazel 4 (Debian's bazel-bootstrap) builds tests/e2e/workspace through a real
Stoker (`python -m engine up`) over plaintext gRPC on 127.0.0.1.

The workspace is first built locally (--spawn_strategy=local) in its own output base; the
remote build must produce the same bytes. Stoker's own log is quoted in every failure message.

Needs Debian's bazel-bootstrap and bazel-platforms (scripts/install-test-deps.sh installs them);
run with `.venv/bin/pytest tests/e2e` from the repository root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
E2E = Path(__file__).resolve().parent
BAZEL = "/usr/bin/bazel"
# Debian's bazel-platforms package; stands in for the @platforms download.
PLATFORMS = Path("/usr/share/bazel/tools/platforms")

GOOD_PACKAGES = ("gen", "tool", "cc", "checks")
GOOD_TARGETS = [f"//{p}/..." for p in GOOD_PACKAGES]
# Bazel writes these itself, with absolute paths of the output base in them.
LOCAL_ONLY_MARKERS = (".runfiles",)

COMMON_FLAGS = [
    "--noshow_progress",
    "--curses=no",
    "--color=no",
    # No bazel-* symlinks: two output bases share one workspace directory.
    "--symlink_prefix=/",
    "--verbose_failures",
]
BAZEL_TIMEOUT = 180

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(BAZEL),
        reason=f"{BAZEL} is absent (install it with scripts/install-test-deps.sh)",
    ),
    pytest.mark.timeout(240),
]


# ---------------------------------------------------------------------------------------
# Stoker process


class Stoker:
    """A `python -m engine up` subprocess with its log captured to a file."""

    def __init__(self, data_dir: Path, log_path: Path, workers: int = 2,
                 config: Path | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.workers = workers
        self.config = config  # an executor.yaml; the flags below win over it
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_within: float = 30.0) -> None:
        python = REPO / ".venv" / "bin" / "python"
        argv = [
            str(python if python.exists() else Path(sys.executable)),
            "-m", "engine", "up",
            "--data-dir", str(self.data_dir),
            "--listen", self.address,
            "--workers", str(self.workers),
            "--default-timeout", "60",
            "--health-listen", "off", "--metrics-listen", "off",
            *(["--config", str(self.config)] if self.config else []),
        ]
        with open(self.log_path, "wb") as log:
            # Own session: a fallback SIGKILL can reach the whole tree by group id.
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"stoker exited with code {self.proc.returncode} before listening on "
                    f"{self.address}\n{self.log_tail()}"
                )
            if _answers_capabilities(self.address):
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"stoker did not listen on {self.address} within {ready_within}s\n"
                    f"{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pid(self, slot: int) -> int | None:
        try:
            return int((self.data_dir / "run" / f"worker-{slot}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, limit: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        state = "running" if self.alive() else f"exited {self.proc and self.proc.returncode}"
        return f"--- stoker log ({state}, last {limit} chars) ---\n{text[-limit:]}"


def _answers_capabilities(address: str) -> bool:
    """True once a GetCapabilities call gets any reply (a listening socket is not enough:
    the port can be bound before the server serves)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        try:
            call(b"", timeout=1.0)  # an empty GetCapabilitiesRequest: instance ""
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Bazel


@dataclass
class Result:
    returncode: int
    output: str
    elapsed: float

    def processes(self) -> dict[str, int]:
        """Counts from the last 'INFO: N processes: ...' summary line, by kind."""
        lines = re.findall(r"INFO: \d+ process(?:es)?: (.*)\.\s*$", self.output, re.M)
        if not lines:
            return {}
        counts: dict[str, int] = {}
        for part in lines[-1].split(","):
            number, _, kind = part.strip().partition(" ")
            counts[kind] = counts.get(kind, 0) + int(number)
        return counts


class Bazel:
    """One Bazel server (one output base) with a private HOME, driven by subprocess."""

    def __init__(self, workspace: Path, root: Path, name: str, context: Stoker | None) -> None:
        self.workspace = workspace
        self.output_base = root / f"ob-{name}"
        self.startup = [
            BAZEL,
            f"--output_user_root={root / 'user-root'}",
            f"--output_base={self.output_base}",
            # Outlives a crashed test run by minutes at most.
            "--max_idle_secs=300",
        ]
        home = root / "home"
        home.mkdir(exist_ok=True)
        self.env = dict(os.environ, HOME=str(home))
        self.context = context
        self._bin: Path | None = None

    def run(self, command: str, *args: str, timeout: float = BAZEL_TIMEOUT) -> Result:
        started = time.monotonic()
        proc = self.popen(command, *args)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = interrupt(proc)
            pytest.fail(f"bazel {command} {' '.join(args)} ran over {timeout}s\n"
                        f"{out.decode(errors='replace')}\n"
                        f"{self.context.log_tail() if self.context else ''}")
        return Result(proc.returncode, out.decode(errors="replace"), time.monotonic() - started)

    def popen(self, command: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*self.startup, command, *COMMON_FLAGS, *args], cwd=self.workspace, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

    def explain(self, result: Result) -> str:
        tail = self.context.log_tail() if self.context else ""
        return (f"bazel exited {result.returncode} after {result.elapsed:.1f}s\n"
                f"--- bazel output ---\n{result.output[-8000:]}\n{tail}")

    def bin_dir(self) -> Path:
        if self._bin is None:
            result = self.run("info", "bazel-bin")
            assert result.returncode == 0, self.explain(result)
            self._bin = Path(result.output.strip().splitlines()[-1])
        return self._bin

    def testlogs_dir(self) -> Path:
        return self.bin_dir().parent / "testlogs"

    def shutdown(self) -> None:
        try:
            subprocess.run([*self.startup, "shutdown"], cwd=self.workspace, env=self.env,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            # The server is still busy with a command; it is ours, so end it by its pid.
            try:
                pid = int((self.output_base / "server" / "server.pid.txt").read_text())
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


def interrupt(proc: subprocess.Popen[bytes]) -> bytes:
    """Stops a Bazel client; on SIGINT it also makes its server cancel the command, which
    a SIGKILL of the client alone would leave running."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or b""


def collect_outputs(bin_dir: Path) -> dict[str, bytes]:
    """Every action output of the good packages, keyed by path under bazel-bin."""
    found: dict[str, bytes] = {}
    for package in GOOD_PACKAGES:
        for path in sorted((bin_dir / package).rglob("*")):
            rel = path.relative_to(bin_dir).as_posix()
            if path.is_file() and not any(m in rel for m in LOCAL_ONLY_MARKERS):
                found[rel] = path.read_bytes()
    return found


def run_hello(bin_dir: Path) -> str:
    done = subprocess.run([str(bin_dir / "cc" / "hello")], capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def assert_same_outputs(local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    assert sorted(remote) == sorted(local), "remote and local builds made different files"
    differ = [p for p in local if local[p] != remote[p]]
    assert not differ, f"outputs differ between the local and the remote build: {differ}"


# ---------------------------------------------------------------------------------------
# Fixtures (module scope: Bazel servers take seconds to start on two cores)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bazel-e2e")


@pytest.fixture(scope="module")
def workspace(root: Path) -> Path:
    if not (PLATFORMS / "BUILD").exists():
        pytest.fail(f"{PLATFORMS} is missing: install bazel-platforms "
                    "(scripts/install-test-deps.sh)")
    ws = root / "ws"
    shutil.copytree(E2E / "workspace", ws)
    text = (ws / "WORKSPACE.template").read_text()
    text = text.replace("@STUBS@", str(E2E / "stubs")).replace("@PLATFORMS@", str(PLATFORMS))
    (ws / "WORKSPACE").write_text(text)
    return ws


@dataclass
class LocalReference:
    outputs: dict[str, bytes]
    hello_stdout: str


@pytest.fixture(scope="module")
def local_reference(workspace: Path, root: Path) -> LocalReference:
    bazel = Bazel(workspace, root, "local", None)
    try:
        result = bazel.run("build", "--spawn_strategy=local", *GOOD_TARGETS)
        assert result.returncode == 0, bazel.explain(result)
        bin_dir = bazel.bin_dir()
        reference = LocalReference(collect_outputs(bin_dir), run_hello(bin_dir))
    finally:
        # Frees the JVM before the remote server starts.
        bazel.shutdown()
    assert "cc/hello" in reference.outputs and "gen/big.bin" in reference.outputs
    return reference


@pytest.fixture(scope="module")
def stoker(root: Path) -> Iterator[Stoker]:
    # Actions run as another user ('nobody' under root), so the data dir must sit on a
    # path that user can search; pytest's own tmp dirs are private (0700).
    data_dir = Path(tempfile.mkdtemp(prefix="stoker-e2e-"))
    data_dir.chmod(0o711)
    server = Stoker(data_dir, root / "stoker.log")
    try:
        server.start()
        yield server
    finally:
        code = server.stop()
        if code not in (None, 0, -signal.SIGTERM):
            print(f"stoker exited with code {code} on SIGTERM\n{server.log_tail()}")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def remote(workspace: Path, root: Path, stoker: Stoker) -> Iterator[Bazel]:
    bazel = Bazel(workspace, root, "remote", stoker)
    yield bazel
    bazel.shutdown()


def remote_flags(stoker: Stoker) -> list[str]:
    return [
        f"--remote_executor=grpc://{stoker.address}",
        "--remote_timeout=60",
        "--spawn_strategy=remote",
        "--jobs=8",
    ]


@pytest.fixture(scope="module")
def remote_build(local_reference: LocalReference, remote: Bazel, stoker: Stoker) -> Result:
    # local_reference comes first: its Bazel server is shut down before Stoker starts.
    result = remote.run("build", *remote_flags(stoker), *GOOD_TARGETS)
    assert result.returncode == 0, remote.explain(result)
    return result


# ---------------------------------------------------------------------------------------
# Tests


def test_remote_build_matches_local_build(
    remote: Bazel, remote_build: Result, local_reference: LocalReference
) -> None:
    bin_dir = remote.bin_dir()
    assert_same_outputs(local_reference.outputs, collect_outputs(bin_dir))
    assert run_hello(bin_dir) == local_reference.hello_stdout
    assert (bin_dir / "gen" / "pair" / "empty_copy.txt").stat().st_size == 0
    assert b"QUINCE" in (bin_dir / "gen" / "shouted.txt").read_bytes()


def test_remote_build_ran_actions_remotely(remote: Bazel, remote_build: Result) -> None:
    counts = remote_build.processes()
    assert counts.get("remote", 0) >= 10, remote.explain(remote_build)
    assert set(counts) <= {"remote", "internal"}, remote.explain(remote_build)


def test_rebuild_after_clean_is_served_from_remote_cache(
    remote: Bazel, stoker: Stoker, remote_build: Result, local_reference: LocalReference
) -> None:
    cleaned = remote.run("clean")
    assert cleaned.returncode == 0, remote.explain(cleaned)
    result = remote.run("build", *remote_flags(stoker), *GOOD_TARGETS)
    assert result.returncode == 0, remote.explain(result)
    counts = result.processes()
    assert counts.get("remote cache hit", 0) >= 10, remote.explain(result)
    assert set(counts) <= {"remote cache hit", "internal"}, remote.explain(result)
    assert_same_outputs(local_reference.outputs, collect_outputs(remote.bin_dir()))


def test_failing_action_fails_build_and_shows_its_stderr(
    remote: Bazel, stoker: Stoker, remote_build: Result
) -> None:
    # Twice: a failed result must not be cached and served as a success.
    for _ in range(2):
        result = remote.run("build", *remote_flags(stoker), "//fail:broken")
        assert result.returncode == 1, remote.explain(result)
        assert "STOKER-E2E-BROKEN: the action failed on purpose" in result.output, \
            remote.explain(result)
        assert "Executing genrule //fail:broken failed" in result.output, remote.explain(result)


def test_sh_test_passes_remotely(remote: Bazel, stoker: Stoker, remote_build: Result) -> None:
    result = remote.run("test", *remote_flags(stoker), "//checks:outputs_test")
    assert result.returncode == 0, remote.explain(result)
    assert re.search(r"//checks:outputs_test\s+PASSED", result.output), remote.explain(result)
    assert result.processes().get("remote", 0) >= 1, remote.explain(result)
    log = (remote.testlogs_dir() / "checks" / "outputs_test" / "test.log").read_text()
    assert "outputs_test: all checks passed" in log


def test_test_over_its_timeout_is_reported_as_timeout(
    remote: Bazel, stoker: Stoker, remote_build: Result
) -> None:
    # A per-run sleep length: a leftover process of this run is then unmistakable.
    sleep_arg = f"47.{uuid.uuid4().int % 10**6:06d}"
    result = remote.run(
        "test", *remote_flags(stoker), "--test_timeout=3",
        f"--test_env=STOKER_E2E_SLEEP={sleep_arg}", "//timeout:sleeps_test",
    )
    assert result.returncode == 3, remote.explain(result)
    assert re.search(r"//timeout:sleeps_test\s+TIMEOUT", result.output), remote.explain(result)
    assert result.elapsed < 30, remote.explain(result)
    # The whole action tree goes when the timeout fires, not only the shell.
    deadline = time.monotonic() + 5
    while (left := _processes_with_argv(["sleep", sleep_arg])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"timed-out action left processes behind: {left}\n{stoker.log_tail()}"


def test_killed_worker_does_not_fail_the_build(
    remote: Bazel, stoker: Stoker, remote_build: Result
) -> None:
    build_survives_a_killed_worker(remote, stoker, remote_flags(stoker))
    assert stoker.alive(), stoker.log_tail()


def build_survives_a_killed_worker(remote: Bazel, stoker, flags: list[str]) -> None:
    """//slow:all_slow builds although a worker running one of its actions is SIGKILLed, and
    the supervisor replaces that worker. stoker: anything with workers, worker_pid(slot),
    data_dir and log_tail() (`stoker up` here, `stoker executor` in tests/buildgrid)."""
    salt = uuid.uuid4().hex
    build = remote.popen("build", *flags, f"--action_env=STOKER_E2E_SALT={salt}",
                         "//slow:all_slow")
    try:
        victim = _wait_for_busy_worker(stoker, build, f"STOKER_E2E_SALT={salt}")
        os.kill(victim.pid, signal.SIGKILL)
        out, _ = build.communicate(timeout=BAZEL_TIMEOUT)
    finally:
        if build.poll() is None:
            interrupt(build)
    result = Result(build.returncode, out.decode(errors="replace"), 0.0)
    assert result.returncode == 0, remote.explain(result)
    bin_dir = remote.bin_dir()
    for i in range(8):
        assert (bin_dir / "slow" / f"slow_{i}.txt").read_text() == f"slow {i} {salt}\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = stoker.worker_pid(victim.slot)
        if pid is not None and pid != victim.pid and _pid_alive(pid):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {victim.slot} (pid {victim.pid}) was not restarted\n"
                    f"{stoker.log_tail()}")


# ---------------------------------------------------------------------------------------
# Process helpers (Linux /proc)


@dataclass
class Victim:
    slot: int
    pid: int


def _wait_for_busy_worker(
    stoker: Stoker, build: subprocess.Popen[bytes], env_marker: str, within: float = 60.0
) -> Victim:
    """The worker running one of this build's actions, found by the action's environment."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if build.poll() is not None:
            out = build.stdout.read().decode(errors="replace") if build.stdout else ""
            pytest.fail(f"the build ended before a worker was seen running it:\n{out}\n"
                        f"{stoker.log_tail()}")
        workers = {}
        for slot in range(stoker.workers):
            pid = stoker.worker_pid(slot)
            if pid is not None:
                workers[pid] = slot
        parents = _parent_map()
        for pid in _pids_with_env(env_marker):
            ancestor = parents.get(pid)
            while ancestor and ancestor not in workers:
                ancestor = parents.get(ancestor)
            if ancestor:
                return Victim(workers[ancestor], ancestor)
        time.sleep(0.05)
    pytest.fail(f"no worker process was seen running the build's actions within {within}s "
                f"(pid files: {stoker.data_dir / 'run'})\n{stoker.log_tail()}")


def _parent_map() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses; fields resume after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _pids_with_env(marker: str) -> list[int]:
    needle = marker.encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if needle in Path(entry.path, "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _processes_with_argv(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry.path, "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited even though the pid still answers.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_build_under_the_sandbox_matches_the_local_build(
    remote: Bazel, stoker: Stoker, remote_build: Result, local_reference: LocalReference
) -> None:
    """--remote_default_exec_properties=workload-isolation-type=sandbox: every action runs
    under bubblewrap (//where:where shows the fixed exec root and an empty /run), nothing
    is served from the cache (the platform is part of each action's key), and the outputs
    are the local build's."""
    cleaned = remote.run("clean")
    assert cleaned.returncode == 0, remote.explain(cleaned)
    flags = [*remote_flags(stoker),
             "--remote_default_exec_properties=workload-isolation-type=sandbox"]
    result = remote.run("build", *flags, *GOOD_TARGETS, "//where")
    assert result.returncode == 0, remote.explain(result)
    counts = result.processes()
    assert counts.get("remote", 0) >= 10 and "remote cache hit" not in counts, \
        remote.explain(result)
    bin_dir = remote.bin_dir()
    assert_same_outputs(local_reference.outputs, collect_outputs(bin_dir))
    assert run_hello(bin_dir) == local_reference.hello_stdout
    where, uid, run_entries = (bin_dir / "where" / "where.txt").read_text().split()
    assert where.startswith("/execroot") and uid != "0" and run_entries == "0", where


@pytest.mark.parametrize("kept", [False, True], ids=["fresh", "recycle-runner"])
def test_the_build_in_podman_containers_matches_the_local_build(
    remote: Bazel, stoker: Stoker, remote_build: Result, local_reference: LocalReference,
    kept: bool
) -> None:
    """workload-isolation-type=podman with container-image=docker://<the test base image>:
    the genrule and shell targets (the base image has no C compiler) run in containers of
    that image, as their slot uid, and make the local build's outputs; no container is left.
    With recycle-runner=true the same in kept containers (a slot uid's actions one after
    another in one container); only those, idle, are left for the next build."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/install-test-deps.sh installs it)")
    from tests.images import ImageError, ensure_base_image

    try:
        image = ensure_base_image()
    except ImageError as e:
        pytest.fail(str(e))
    cleaned = remote.run("clean")
    assert cleaned.returncode == 0, remote.explain(cleaned)
    flags = [*remote_flags(stoker),
             "--remote_default_exec_properties=workload-isolation-type=podman",
             f"--remote_default_exec_properties=container-image=docker://{image}",
             *(["--remote_default_exec_properties=recycle-runner=true"] if kept else [])]
    result = remote.run("build", *flags, "//gen/...", "//tool/...", "//where")
    assert result.returncode == 0, remote.explain(result)
    assert result.processes().get("remote", 0) >= 5, remote.explain(result)
    bin_dir = remote.bin_dir()
    local = {p: b for p, b in local_reference.outputs.items() if p.startswith(("gen/", "tool/"))}
    remote_outputs = {p: b for p, b in collect_outputs(bin_dir).items()
                      if p.startswith(("gen/", "tool/"))}
    assert_same_outputs(local, remote_outputs)
    where, uid, _ = (bin_dir / "where" / "where.txt").read_text().split()
    assert where == "/execroot" and uid != "0", where
    names = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    left = [n for n in names if n.startswith("stoker-")]
    if kept:
        assert left and all("-kept-" in n for n in left), names
    else:
        assert not [n for n in left if "-kept-" not in n], names


def test_the_build_with_isolation_type_docker_matches_the_local_build(
    remote: Bazel, root: Path, remote_build: Result, local_reference: LocalReference
) -> None:
    """A Stoker whose executor.yaml says isolation.type: docker (Debian's dockerd, started
    here, with the test base image as default_image) builds the genrule and shell targets
    (the image has no C compiler) in Docker containers, with the local build's outputs and
    no container left behind."""
    if shutil.which("dockerd") is None or shutil.which("podman") is None:
        pytest.skip("dockerd and podman are needed (scripts/install-test-deps.sh)")
    from tests.images import (
        ImageError,
        ensure_base_image,
        load_into_engine,
        start_docker_engine,
        stop_engine,
    )

    run = tempfile.mkdtemp(prefix="stoker-e2e-docker-", dir="/run")
    data_dir = Path(tempfile.mkdtemp(prefix="stoker-e2e-docker-"))
    data_dir.chmod(0o711)
    try:
        image = ensure_base_image()
        engine, sock = start_docker_engine("dockerd", run)
    except ImageError as e:
        pytest.fail(str(e))
    try:
        load_into_engine(sock, image)
        config = root / "docker-executor.yaml"
        config.write_text(f"executor:\n  isolation:\n    type: docker\n"
                          f"    docker_socket: {sock}\n    default_image: {image}\n")
        config.chmod(0o600)
        docker_stoker = Stoker(data_dir, root / "stoker-docker.log", config=config)
        docker_stoker.start()
        try:
            cleaned = remote.run("clean")
            assert cleaned.returncode == 0, remote.explain(cleaned)
            result = remote.run("build", *remote_flags(docker_stoker), "//gen/...",
                                "//tool/...", "//where")
            assert result.returncode == 0, remote.explain(result) + docker_stoker.log_tail()
            assert result.processes().get("remote", 0) >= 5, remote.explain(result)
        finally:
            docker_stoker.stop()
        bin_dir = remote.bin_dir()
        local = {p: b for p, b in local_reference.outputs.items()
                 if p.startswith(("gen/", "tool/"))}
        built = {p: b for p, b in collect_outputs(bin_dir).items()
                 if p.startswith(("gen/", "tool/"))}
        assert_same_outputs(local, built)
        where, uid, _ = (bin_dir / "where" / "where.txt").read_text().split()
        assert where == "/execroot" and uid != "0", where
        import docker

        left = docker.DockerClient(base_url=f"unix://{sock}").containers.list(all=True)
        assert left == [], left
    finally:
        stop_engine(engine)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
