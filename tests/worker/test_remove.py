"""engine/pipeline/remove.py on trees an action could leave: deeper than PATH_MAX and the
recursion limit, wide, unreadable, full of links out, or holding what cannot be removed."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from engine.pipeline.remove import empty_dir, purge_quarantine, quarantine, remove_tree

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
DEPTH = 10_000

# Shared with the child processes below, which run it before their own code.
MAKE_DEEP = textwrap.dedent('''
    import os

    def make_deep(top, depth, modes=None, file_every=0):
        """A chain of depth directories named 'd' below top, made through fds (the path
        is far longer than PATH_MAX); modes(i) is set on level i once its child exists."""
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            if file_every and i % file_every == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if modes is not None:
                os.fchmod(fd, modes(i))
            os.close(fd)
            fd = child
        os.close(fd)
''')
exec(MAKE_DEEP)  # defines make_deep here too


@pytest.fixture
def scratch(tmp_path):
    """A fresh directory on tmpfs when there is one: the same syscalls, and making 10,000
    levels takes 0.1 s there instead of seconds on a busy disk. Reachable by 'nobody'."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="stoker-remove-", dir=shm)
    os.chmod(path, 0o755)
    yield Path(path)
    remove_tree(path)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_child(code: str, *args: str, as_nobody: bool = False) -> None:
    """Run code (after MAKE_DEEP) in a fresh Python with at most 100 open files, so a walk
    that kept one fd per level would fail."""
    prelude = ("import resource, sys\n"
               "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))\n")
    argv = [sys.executable, "-c", prelude + MAKE_DEEP + textwrap.dedent(code), *args]
    if as_nobody:
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_removes_a_tree_far_deeper_than_path_max_with_few_fds(scratch):
    run_child('''
        from engine.pipeline.remove import remove_tree
        top = sys.argv[1] + "/tree"
        os.mkdir(top)
        make_deep(top, 10_000, file_every=7)
        remove_tree(top)
        assert os.listdir(sys.argv[1]) == []
    ''', str(scratch))


def test_empty_dir_on_a_deep_tree_keeps_the_top_and_leaks_no_fd(scratch):
    top = scratch / "root"
    top.mkdir()
    make_deep(str(top), DEPTH)  # noqa: F821 (from MAKE_DEEP)
    (top / "file").write_bytes(b"x")
    gc.collect()  # earlier tests' garbage must not close its fds during the count
    before = open_fds()
    empty_dir(str(top))
    assert open_fds() <= before
    assert list(top.iterdir()) == []


def test_shutil_rmtree_fails_where_remove_tree_does_not(scratch):
    """Python 3.11's rmtree recurses once per level: 10,000 levels end in RecursionError
    (or an OSError on the long path), leaving the tree behind. Ours removes it."""
    top = scratch / "tree"
    top.mkdir()
    make_deep(str(top), DEPTH)  # noqa: F821
    with pytest.raises((RecursionError, OSError)):
        shutil.rmtree(top)
    assert top.exists()
    remove_tree(str(top))
    assert not top.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run the removal as another, unprivileged user")
def test_unprivileged_removal_of_unreadable_and_unwritable_dirs(scratch):
    """As a non-root user (who, unlike root, is bound by modes), a 10,000-level tree whose
    directories are 000, 0500, 0100, 0300 and 0600 is removed, and so is the content of a
    0500 directory kept by empty_dir."""
    base = str(scratch / "nobody")
    os.mkdir(base)
    os.chown(base, NOBODY, NOBODY)
    try:
        run_child('''
            import stat
            from engine.pipeline.remove import empty_dir, remove_tree
            base = sys.argv[1]
            top = base + "/tree"
            os.mkdir(top)
            modes = [0o000, 0o500, 0o100, 0o300, 0o600]
            make_deep(top, 10_000, modes=lambda i: modes[i % len(modes)], file_every=3)
            try:
                os.listdir(top)
            except PermissionError:
                pass
            else:
                raise AssertionError("the tree should be unreadable to its owner")
            remove_tree(top)
            assert os.listdir(base) == []

            kept = base + "/kept"
            os.mkdir(kept)
            make_deep(kept, 50, modes=lambda i: modes[i % len(modes)], file_every=1)
            os.chmod(kept, 0o500)
            empty_dir(kept)
            assert os.listdir(kept) == []
        ''', base, as_nobody=True)
        assert os.listdir(base) == ["kept"]
    finally:
        remove_tree(base)


@pytest.mark.slow
def test_wide_directory_and_more_subdirectories_than_one_batch(scratch):
    top = scratch / "wide"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(100_000):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        for i in range(3000):  # more than remove._BATCH, each not empty
            os.mkdir(f"d{i}", dir_fd=fd)
            os.close(os.open(f"d{i}/x", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    remove_tree(str(top))
    assert not top.exists()


def outside_tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    content = {"secret": b"must survive", "sub/deep": b"also"}
    for rel, data in content.items():
        (outside / rel).write_bytes(data)
    return outside, content


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_symlinks_out_are_unlinked_not_followed(tmp_path):
    outside, content = outside_tree(tmp_path)
    top = tmp_path / "tree"
    (top / "a" / "b").mkdir(parents=True)
    (top / "to_dir").symlink_to(outside)
    (top / "to_file").symlink_to(outside / "secret")
    (top / "a" / "b" / "to_sub").symlink_to(outside / "sub")
    (top / "a" / "up").symlink_to("../..")
    (top / "a" / "loop").symlink_to("loop")
    (top / "dangling").symlink_to(tmp_path / "nothing")
    remove_tree(str(top))
    assert not top.exists()
    assert files_under(outside) == content


def test_symlink_at_the_top(tmp_path):
    outside, content = outside_tree(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(outside)
    with pytest.raises(OSError) as ei:
        empty_dir(str(link))  # never empties what the link points at
    assert ei.value.errno in (errno.ENOTDIR, errno.ELOOP)
    remove_tree(str(link))
    assert not os.path.lexists(link)
    assert files_under(outside) == content


def test_fifos_sockets_and_files_of_every_mode(tmp_path):
    top = tmp_path / "tree"
    (top / "d").mkdir(parents=True)
    os.mkfifo(top / "fifo")
    os.mkfifo(top / "d" / "fifo2")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(top / "d" / "sock"))
    for mode in (0, 0o400, 0o4755):
        f = top / f"f{mode:o}"
        f.write_bytes(b"x")
        f.chmod(mode)
    if os.geteuid() == 0:
        os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    empty_dir(str(top))
    assert list(top.iterdir()) == []
    remove_tree(str(top))
    remove_tree(str(top))  # nothing there: nothing to do
    assert not top.exists()


@pytest.fixture
def immutable(tmp_path):
    """A file with the immutable attribute (even root cannot unlink it); cleared after."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr to make a file immutable")
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.write_bytes(b"stuck")
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip(f"the filesystem of {path} has no immutable attribute")
        made.append(path)
        return path

    yield make
    for path in made:
        for p in [path, *(tmp_path / "quarantine").rglob(path.name)]:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)


def test_what_cannot_be_removed_is_quarantined_and_reported(tmp_path, immutable, caplog):
    top = tmp_path / "exec-root"
    (top / "a").mkdir(parents=True)
    (top / "a" / "other").write_bytes(b"goes")
    stuck = immutable(top / "a" / "stuck")
    with pytest.raises(PermissionError):
        remove_tree(str(top))
    assert [p.name for p in (top / "a").iterdir()] == ["stuck"]  # the rest is gone

    qdir = tmp_path / "quarantine"
    moved = quarantine(str(top), str(qdir))
    assert not top.exists() and os.path.dirname(moved) == str(qdir)
    assert os.path.basename(moved).startswith("exec-root.")
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    same_name = tmp_path / "other" / "exec-root"
    (same_name / "sub").mkdir(parents=True)
    assert quarantine(str(same_name), str(qdir)) != moved

    left = purge_quarantine(str(qdir))
    assert left == [moved]
    assert "could not remove quarantined" in caplog.text and moved in caplog.text

    subprocess.run(["chattr", "-i", os.path.join(moved, "a", stuck.name)], check=True)
    assert purge_quarantine(str(qdir)) == []
    assert list(qdir.iterdir()) == []
    assert purge_quarantine(str(tmp_path / "never-made")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount")
def test_a_mount_inside_the_tree_is_never_emptied(tmp_path):
    source, content = outside_tree(tmp_path)
    top = tmp_path / "tree"
    point = top / "a" / "mnt"
    point.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(point)], check=True)
    try:
        for remove in (remove_tree, empty_dir):
            with pytest.raises(OSError) as ei:
                remove(str(top))
            assert ei.value.errno == errno.EBUSY
        assert files_under(source) == content
    finally:
        subprocess.run(["umount", str(point)], check=True)
    remove_tree(str(top))
    assert not top.exists()
