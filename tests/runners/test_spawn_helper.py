"""The spawn helper's mount namespace, run directly (engine/_spawn), on both of its ways to
build it: the new mount API (one detached tmpfs, clones moved into place; what every worker
uses where the kernel has it) and the classic mounts (--classic-mounts: what a kernel before
5.2 gets). Either way the action sees the host read-only, its own directories writable, one
private tmpfs behind /tmp, /var/tmp and /dev/shm, the hidden directory empty, and no fd but
0, 1 and 2 whatever its starter left open."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runners import containment, spawn

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and slot uids need root")

UID = 60976  # a slot uid no other test uses
PY = "/usr/bin/python3"

PROBE = textwrap.dedent("""
    import os, sys
    root, hidden, secret = sys.argv[1:4]
    def writable(path):
        try:
            with open(os.path.join(path, "probe"), "w") as f:
                f.write("x")
            return "rw"
        except OSError as e:
            return "ro" if e.errno == 30 else f"errno {e.errno}"
    for path in (root, "/tmp", "/var/tmp", "/dev/shm", "/usr", "/etc"):
        print(path, writable(path))
    try:
        listed = sorted(os.listdir(hidden))
    except PermissionError:
        listed = "unlistable"
    print("hidden", listed, os.path.exists(secret))
    print("fds", sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
    st = os.statvfs("/tmp")
    print("tmp size", st.f_blocks * st.f_frsize)
    same = os.stat("/tmp").st_dev == os.stat("/dev/shm").st_dev == os.stat("/var/tmp").st_dev
    print("one tmpfs", same)
    """)


@pytest.fixture
def layout() -> Iterator[tuple[Path, Path, Path]]:
    if containment.detect(True) != containment.PID_NAMESPACE:
        pytest.skip("no namespaces here")
    # Not under /tmp, which the action gets a tmpfs of its own for.
    tmp_path = Path(tempfile.mkdtemp(prefix="stoker-spawn-test-", dir="/run"))
    os.chmod(tmp_path, 0o755)
    hidden = tmp_path / "data"
    hidden.mkdir()
    (hidden / "secret").write_text("root's")
    action = hidden / "build" / "a1"
    root, tmp = action / "root", action / "tmp"
    for d in (root, tmp):
        d.mkdir(parents=True)
        os.chown(d, UID, UID)
    for d in (hidden, hidden / "build", action):
        d.chmod(0o711)
    yield hidden, root, tmp
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("classic", [False, True], ids=["new-mount-api", "classic-mounts"])
def test_the_actions_mount_namespace(layout, classic):
    hidden, root, tmp = layout
    leaked = os.open("/etc/hostname", os.O_RDONLY)  # inheritable: a starter's careless fd
    os.set_inheritable(leaked, True)
    args = [spawn.require_helper(), "--uid", str(UID), "--gid", str(UID), "--cwd", str(root),
            "--pidns", "--ipcns", "--netns", "--mountns", "--hide", str(hidden),
            "--tmp-size", str(8 << 20), "--keep", str(root), "--keep", str(tmp)]
    for path in spawn.private_tmp():
        args += ["--tmpfs", path]
    if classic:
        args.append("--classic-mounts")
    try:
        r = subprocess.run([*args, "--", PY, "-c", PROBE, str(root), str(hidden),
                            str(hidden / "secret")], capture_output=True, text=True,
                           timeout=30, env={}, close_fds=False)
    finally:
        os.close(leaked)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:6] == [f"{root} rw", "/tmp rw", "/var/tmp rw", "/dev/shm rw", "/usr ro",
                         "/etc ro"], lines
    assert lines[6] == "hidden unlistable False", lines  # an empty 0711 in its place
    assert lines[7] == "fds [0, 1, 2, 3]", lines  # 3: listdir's own
    assert lines[8] == f"tmp size {8 << 20}", lines
    # The new API shares one tmpfs among the three; the classic way mounts one each.
    assert lines[9] == f"one tmpfs {not classic}", lines
    assert (root / "probe").read_text() == "x"  # the action's directory is the real one
