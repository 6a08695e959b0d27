"""Each isolation runner's per-action cost through Stoker beside the bare tool doing the same
work in the same run: a no-op action (/bin/true as a slot uid), one at a time.

- sandbox: Stoker's sandbox runner (the spawn helper, then bubblewrap with the exec root and
  TMPDIR by fd, the Command's environment through an argument memfd, its JSON status read
  back) vs `bwrap` run directly with the same mounts and namespaces, as root (no helper, no
  fds, no status).

- podman: Stoker's podman runner (podman run with the spawn helper bind-mounted, the
  environment through a memfd, the start reported on a status pipe) vs `podman run --rm
  --network none IMAGE true` with the same runtime, rlimits and mounts. IMAGE is the tests'
  base image (tests/images.py makes it; without it this row is skipped, saying so).

- docker: Stoker's docker runner (the docker SDK: create, start, wait, reload, remove; the
  environment, status and stdout/stderr through control files) vs `docker run --rm
  --network none IMAGE true` with the same flags, against a dockerd started for the run on
  a socket of its own (no bridge, no iptables), the base image loaded into it.

Target (issue 14): Stoker's added time at most 10% of the tool's own, that is Stoker's
actions/s at least 1/1.1 of the tool's.

- recycle-runner (podman, docker): the same runner, no-op actions one at a time with
  `recycle-runner=true` (each a podman exec / Docker API exec in the kept container, every
  leftover killed and the container checked clean after it) vs without (a fresh container
  each). Target: kept at least 1.1x fresh (less and keeping containers is not worth what it
  holds).

Needs root, bubblewrap and podman; otherwise the benchmark says why and is skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from bench.common import Measured
from engine.config import Config
from engine.runners import containment, sandbox
from engine.runners.bare import BareRunner
from engine.runners.docker import DockerRunner
from engine.runners.podman import PODMAN_ENV, PodmanRunner, find_podman
from engine.runners.podman import probe as probe_podman
from engine.runners.protocol import RunRequest
from engine.runners.spawn import SlotNetworks

UID = 60981  # a slot uid no test uses
SERIAL = 200  # actions per repeat, each side
CONTAINERS = 10  # podman runs per repeat, each side (a third of a second each)
IMAGE = "localhost/stoker-test-base:bookworm"  # tests/images.py
TARGET = 1 / 1.1
KEPT_TARGET = 1.1


def _request(base: str) -> RunRequest:
    root, tmp = os.path.join(base, "root"), os.path.join(base, "tmp")
    for d in (root, tmp):
        os.makedirs(d, exist_ok=True)
        os.chown(d, UID, UID)
    return RunRequest(["/bin/true"], {"PATH": "/usr/bin:/bin"}, root, "",
                      os.path.join(base, "out"), os.path.join(base, "err"), tmp,
                      run_as=(UID, UID), limits=Config().action_limits())


def _bwrap_directly(bwrap: str, req: RunRequest, hide: tuple[str, ...]) -> list[str]:
    """The same sandbox as bwrap's own command line: paths instead of fds, run as root."""
    args = [bwrap, "--die-with-parent", "--as-pid-1", "--unshare-user", "--disable-userns",
            "--uid", str(UID), "--gid", str(UID), "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-net", *sandbox._root_entries(sandbox.EXEC_ROOT),
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run", "--bind", req.tmpdir, "/tmp",
            "--bind", req.tmpdir, "/var/tmp", "--bind", req.exec_root, sandbox.EXEC_ROOT]
    for path in hide:
        args += ["--tmpfs", path]
    return args + ["--chdir", sandbox.EXEC_ROOT, "--setenv", "PATH", "/usr/bin:/bin",
                   "--setenv", "TMPDIR", "/tmp", "--", "/bin/true"]


def run(repeats: int) -> list[Measured]:
    return run_sandbox(repeats) + run_podman(repeats)


def run_sandbox(repeats: int) -> list[Measured]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (slot uids)")
    bwrap = sandbox.find_bwrap()
    why = sandbox.probe(bwrap, UID, UID)
    if why is not None or bwrap is None:
        raise RuntimeError(f"no sandbox here: {why}")
    base = tempfile.mkdtemp(prefix="stoker-bench-runners-", dir="/var/lib")
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    os.makedirs(data)
    networks = SlotNetworks(os.path.join(base, "netns"))
    mechanism = containment.detect(True)
    bare = BareRunner(mechanism, networks=networks if mechanism == containment.PID_NAMESPACE
                      else None, hide=(data,))
    runner = sandbox.SandboxRunner(bwrap, bare)
    req = _request(os.path.join(base, "a"))
    direct = _bwrap_directly(bwrap, req, (data,))
    try:
        stoker_rates, tool_rates = _alternate(runner, req, direct, {}, SERIAL, repeats)
    finally:
        networks.release()
        shutil.rmtree(base, ignore_errors=True)
    return [_sandbox_row(stoker_rates, tool_rates)]


def _sandbox_row(stoker_rates: list[float], tool_rates: list[float]) -> Measured:
    return _row("sandbox runner, no-op action one at a time, vs bwrap alone",
                "`bwrap` with the same namespaces and mounts, run directly", "bwrap",
                stoker_rates, tool_rates, 2, "; Stoker joins the slot's kept network namespace "
                "where bwrap alone makes one")


def _alternate(runner, req: RunRequest, tool_argv: list[str], tool_env: dict[str, str],
               n: int, repeats: int) -> tuple[list[float], list[float]]:
    """(Stoker's rates, the tool's): n no-op actions one at a time, each side in turn, after
    one warming round of both."""
    async def through_stoker() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            result = await runner.run(req)
            assert result.exit_code == 0, result
        return n / (time.perf_counter() - t0)

    def tool() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            subprocess.run(tool_argv, check=True, env=tool_env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL)
        return n / (time.perf_counter() - t0)

    asyncio.run(through_stoker())
    tool()
    stoker_rates, tool_rates = [], []
    for _ in range(repeats):
        tool_rates.append(tool())
        stoker_rates.append(asyncio.run(through_stoker()))
    return stoker_rates, tool_rates


def _kept_vs_fresh(runner, req: RunRequest, n: int,
                   repeats: int) -> tuple[list[float], list[float]]:
    """(rates with recycle-runner=true, rates without): n no-op actions one at a time
    through the same runner, each side in turn, after one warming round of both."""
    kept = dataclasses.replace(req, platform=(("recycle-runner", "true"),))

    async def rate(r: RunRequest) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            result = await runner.run(r)
            assert result.exit_code == 0, result
        return n / (time.perf_counter() - t0)

    asyncio.run(rate(kept))
    asyncio.run(rate(req))
    kept_rates, fresh_rates = [], []
    for _ in range(repeats):
        fresh_rates.append(asyncio.run(rate(req)))
        kept_rates.append(asyncio.run(rate(kept)))
    asyncio.run(runner.close())
    return kept_rates, fresh_rates


def _kept_row(kind: str, kept_rates: list[float], fresh_rates: list[float]) -> Measured:
    saved = 1 / statistics.median(fresh_rates) - 1 / statistics.median(kept_rates)
    return Measured(
        f"{kind} runner, recycle-runner=true, no-op action one at a time, vs a fresh "
        "container each", "actions/s", kept_rates, fresh_rates,
        f"the same {kind} runner without recycle-runner (a fresh container each action)",
        KEPT_TARGET, note=f"a kept container saves {saved * 1e3:.0f} ms an action")


def _row(name: str, reference: str, tool: str, stoker_rates: list[float],
         tool_rates: list[float], digits: int, also: str = "") -> Measured:
    added = 1 / statistics.median(stoker_rates) - 1 / statistics.median(tool_rates)
    return Measured(
        name, "actions/s", stoker_rates, tool_rates, reference, TARGET,
        note=f"Stoker adds {added * 1e3:+.{digits}f} ms an action "
        f"({added * statistics.median(tool_rates):+.0%} of {tool}'s own time{also})",
        criterion="Stoker's added time <= 10% of the tool's")


def run_podman(repeats: int) -> list[Measured]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (slot uids)")
    podman = find_podman()
    why = probe_podman(podman)
    if why is not None or podman is None:
        raise RuntimeError(f"no podman here: {why}")
    if subprocess.run([podman, "image", "exists", IMAGE]).returncode != 0:
        raise RuntimeError(f"{IMAGE} is missing: the podman runner tests make it")
    base = tempfile.mkdtemp(prefix="stoker-bench-podman-", dir="/var/lib")
    os.chmod(base, 0o755)
    runner = PodmanRunner(podman, f"{base}:bench", default_image=IMAGE)
    req = _request(os.path.join(base, "a"))
    direct = [*runner.global_args(), "run", "--rm", "--pull", "never",
              *(["--runtime", runner.runtime] if runner.runtime else []), "--network", "none",
              "--user", f"{UID}:{UID}", "--cap-drop", "all", "--security-opt",
              "no-new-privileges", "--ulimit", f"nofile={runner.nofile}:{runner.nofile}",
              "--ulimit", "nproc=4096:4096", "--pids-limit", "4096",
              "-v", f"{req.exec_root}:/execroot", "-v", f"{req.tmpdir}:/tmp",
              "--workdir", "/execroot", IMAGE, "/bin/true"]
    try:
        stoker_rates, tool_rates = _alternate(runner, req, direct, PODMAN_ENV, CONTAINERS,
                                              repeats)
        kept_rates, fresh_rates = _kept_vs_fresh(runner, req, CONTAINERS, repeats)
    finally:
        asyncio.run(runner.close())
        shutil.rmtree(base, ignore_errors=True)
    return [_row("podman runner, no-op action one at a time, vs podman run alone",
                 "`podman run --rm --network none IMAGE true`, same flags", "podman",
                 stoker_rates, tool_rates, 1),
            _kept_row("podman", kept_rates, fresh_rates)]


def run_docker(repeats: int) -> list[Measured]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (slot uids, dockerd)")
    docker_cli = shutil.which("docker")
    if shutil.which("dockerd") is None or docker_cli is None:
        raise RuntimeError("dockerd and the docker CLI are needed (docker.io)")
    from tests.images import load_into_engine, start_docker_engine, stop_engine

    run_dir = tempfile.mkdtemp(prefix="stoker-bench-docker-", dir="/run")
    base = tempfile.mkdtemp(prefix="stoker-bench-docker-", dir="/var/lib")
    os.chmod(base, 0o755)
    engine, sock = start_docker_engine("dockerd", run_dir)
    try:
        load_into_engine(sock, IMAGE)
        runner = DockerRunner(sock, f"{base}:bench", default_image=IMAGE)
        req = _request(os.path.join(base, "a"))
        direct = [docker_cli, "-H", f"unix://{sock}", "run", "--rm", "--network", "none",
                  "--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt",
                  "no-new-privileges", "--ulimit", f"nofile={runner.nofile}:{runner.nofile}",
                  "--ulimit", "nproc=4096:4096", "--pids-limit", "4096", "--log-driver",
                  "none", "-v", f"{req.exec_root}:/execroot", "-v", f"{req.tmpdir}:/tmp",
                  "--workdir", "/execroot", IMAGE, "/bin/true"]
        stoker_rates, tool_rates = _alternate(runner, req, direct, dict(os.environ),
                                              CONTAINERS, repeats)
        kept_rates, fresh_rates = _kept_vs_fresh(runner, req, CONTAINERS, repeats)
        asyncio.run(runner.close())
    finally:
        stop_engine(engine)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return [_row("docker runner, no-op action one at a time, vs docker run alone",
                 "`docker run --rm --network none IMAGE true`, same flags", "docker",
                 stoker_rates, tool_rates, 1),
            _kept_row("docker", kept_rates, fresh_rates)]


if __name__ == "__main__":
    for m in run(3) + run_docker(3):
        print(m.name, f"{statistics.median(m.stoker):.0f} vs {statistics.median(m.reference):.0f}"
              f" {m.unit} = {m.ratio:.2f}; {m.note}; met: {m.met}")
