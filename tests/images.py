"""The base image the container tests run on, made once per machine: no registry is
reachable from these machines, so Debian bookworm is debootstrapped (minbase) and `podman
import`ed as BASE, and kept in podman's storage between runs (delete it with `podman rmi
localhost/stoker-test-base:bookworm`). `docker import` of the same tree makes it for a Docker
engine.

No mirror is named here: debootstrap gets the apt mirror this machine uses for bookworm
(from its apt sources); where none is set, debootstrap's own default.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

BASE = "localhost/stoker-test-base:bookworm"
DOCKERD_ROOT = "/var/lib/stoker-test-docker"  # the test dockerd's storage, kept between runs
SUITE = "bookworm"


class ImageError(Exception):
    pass


def _apt_entries() -> Iterator[tuple[list[str], str, list[str]]]:
    """(types, uri, suites) of every enabled apt source on this machine, both formats."""
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            # deb [ options ] URI SUITE COMPONENT...
            kind, *rest = line.split("#", 1)[0].split() or [""]
            if rest and rest[0].startswith("["):
                end = next(i for i, w in enumerate(rest + ["]"]) if w.endswith("]"))
                rest = rest[end + 1:]
            if len(rest) >= 2:
                yield [kind], rest[0], [rest[1]]
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        # deb822: stanzas apart by blank lines; a line that starts with a space continues
        # the field above it.
        stanzas: list[dict[str, str]] = [{}]
        last = ""
        for line in text.splitlines():
            if not line.strip():
                stanzas.append({})
            elif line.startswith("#"):
                continue
            elif line[0].isspace() and last in stanzas[-1]:
                stanzas[-1][last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                last = last.strip().lower()
                stanzas[-1][last] = value.strip()
        for fields in stanzas:
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                yield fields.get("types", "").split(), uri, fields.get("suites", "").split()


def apt_mirror(suite: str = SUITE) -> str | None:
    """The Debian mirror this machine's apt uses for suite, for debootstrap; None: use its
    default. Only schemes debootstrap can fetch from (not apt's mirror+ or cdrom:)."""
    for types, uri, suites in _apt_entries():
        if "deb" in types and suite in suites and uri.split(":", 1)[0] in ("http", "https",
                                                                            "file"):
            return uri
    return None


def ensure_base_image() -> str:
    """BASE in podman's storage, debootstrapped and imported on first use."""
    # Two test runs at once must not both debootstrap into the same tag.
    with open("/tmp/stoker-test-base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
            return BASE
        if shutil.which("debootstrap") is None:
            raise ImageError("debootstrap is not installed (scripts/install-test-deps.sh "
                             "installs it) and the base image is missing")
        with tempfile.TemporaryDirectory(prefix="stoker-rootfs-", dir="/var/tmp") as scratch:
            rootfs = os.path.join(scratch, "rootfs")
            # The base image's apt sources name this mirror too, so apt in builds uses it.
            mirror = apt_mirror()
            done = subprocess.run(["debootstrap", "--variant=minbase", SUITE, rootfs,
                                   *([mirror] if mirror else [])],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise ImageError(f"debootstrap failed:\n{(done.stdout + done.stderr)[-4000:]}")
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                imported = subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout,
                                          capture_output=True, text=True, timeout=300)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(timeout=60)
            if imported.returncode != 0:
                raise ImageError(f"podman import failed: {imported.stderr[-2000:]}")
    return BASE


def start_docker_engine(kind: str, run_dir: str) -> tuple[subprocess.Popen, str]:
    """A Docker Engine API on a socket of its own in run_dir: Debian's dockerd (kind
    "dockerd"; no bridge, no iptables of the host touched; its images kept in
    DOCKERD_ROOT between runs) or podman's compatible service ("podman-service").
    Returns the process (its own session) and the socket, once it answers a ping."""
    import time

    import docker

    sock = os.path.join(run_dir, "engine.sock")
    log = os.path.join(run_dir, "engine.log")
    if kind == "dockerd":
        argv = ["dockerd", "--host", f"unix://{sock}", "--data-root", DOCKERD_ROOT,
                "--exec-root", os.path.join(run_dir, "exec"),
                "--pidfile", os.path.join(run_dir, "dockerd.pid"),
                "--iptables=false", "--ip6tables=false", "--bridge=none"]
    else:
        argv = ["podman", "--cgroup-manager=cgroupfs", "--events-backend=file", "system",
                "service", "--time=0", f"unix://{sock}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ImageError(f"{kind} exited {proc.returncode}:\n"
                             f"{Path(log).read_text()[-3000:]}")
        if os.path.exists(sock):
            try:
                docker.DockerClient(base_url=f"unix://{sock}", timeout=5).ping()
                return proc, sock
            except Exception:
                pass
        time.sleep(0.2)
    stop_engine(proc)
    raise ImageError(f"{kind} did not answer on {sock} within 60 s:\n"
                     f"{Path(log).read_text()[-3000:]}")


def stop_engine(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_into_engine(sock: str, image: str) -> None:
    """image (from podman's storage) into the engine at sock, unless it has it."""
    import docker

    client = docker.DockerClient(base_url=f"unix://{sock}", timeout=300)
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    saved = subprocess.run(["podman", "image", "save", "--format", "docker-archive", image],
                           capture_output=True, timeout=300, check=True)
    client.images.load(saved.stdout)


def base_image_or_skip() -> str:
    """BASE for a test module's fixture: skipped where podman is missing, failed (with the
    reason) where the image cannot be made."""
    import pytest

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/install-test-deps.sh installs it)")
    try:
        return ensure_base_image()
    except ImageError as e:
        pytest.fail(str(e))


@contextlib.contextmanager
def running_engine(kind: str, image: str) -> Iterator[str]:
    """A Docker Engine API of kind ("dockerd", "podman-service") on a socket of its own
    under /run, with image loaded; its socket. Stopped and cleaned up after. Raises
    ImageError when it does not start."""
    run_dir = tempfile.mkdtemp(prefix="stoker-test-engine-", dir="/run")
    try:
        proc, sock = start_docker_engine(kind, run_dir)
        try:
            load_into_engine(sock, image)
            yield sock
        finally:
            stop_engine(proc)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
